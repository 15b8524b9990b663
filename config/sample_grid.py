# A grid of every CIFAR-10 class, 10 images each, with the guidance the checkpoint was trained for, and the denoising paths.
#   python sample.py config/sample_grid.py --ckpt=out-cifar/ckpt.pt
classes = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"
num_per_class = 10
seed = 0
trajectory = True
out_dir = "samples"
