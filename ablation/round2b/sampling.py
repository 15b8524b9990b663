# FID of one checkpoint under several sampler settings, one process (Inception and the compiled model built once):
#   python ablation/round2b/sampling.py CKPT N "cfg=1.5" "cfg=2 eta=0.5" "cfg=2 guide=other/ckpt.pt" "cfg=3 interval=0.2,0.8"
# keys: sampler steps cfg eta guide (autoguidance: a weaker checkpoint's EMA in place of the unconditional model)
# interval (guidance only for t in it), seed, guideraw=1 (the guide's raw weights, not its EMA), guidenull=1 (the guide
# told no class), shift (DDIM's grid warped by model.TIME_SHIFT); CKPT@raw samples the raw weights; reference: ./cifar10-jpg-test-fid-stats.npz
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch
import fid, model as M
from checkpoint import load_checkpoint
from runtime import autocast_context, compile_model

ckpt, n = sys.argv[1], int(sys.argv[2])
net_g, schedule, meta, _ = load_checkpoint(ckpt.removesuffix("@raw"), not ckpt.endswith("@raw"), "cpu")
compiled = compile_model(net_g, "cpu")
inception = fid.load_inception("", "cpu")
stats = fid.load_stats("cifar10-jpg-test-fid-stats.npz")
ref = (stats["mu"], stats["sigma"])
autocast = autocast_context("cpu", "bfloat16")
guides = {}
for spec in sys.argv[3:]:
    s = dict(sampler="ddim", steps="20", cfg="1.5", eta="0", guide="", interval="0,1", seed="0", guideraw="0",
             guidenull="0", shift="1")
    s.update(kv.split("=", 1) for kv in spec.split())
    key = (s["guide"], s["guideraw"])
    if s["guide"] and key not in guides:
        guides[key] = compile_model(load_checkpoint(s["guide"], s["guideraw"] == "0", "cpu")[0], "cpu")
    M.GUIDE = guides[key] if s["guide"] else None
    M.GUIDE_NULL, M.TIME_SHIFT = s["guidenull"] == "1", float(s["shift"])
    M.GUIDE_INTERVAL = tuple(map(float, s["interval"].split(",")))
    t0 = time.time()
    score, _ = fid.score(compiled, schedule, meta, inception, ref, n, None, int(s["seed"]), 100, autocast,
                         sampler=s["sampler"], steps=int(s["steps"]), cfg_scale=float(s["cfg"]), eta=float(s["eta"]))
    print(f"RESULT {ckpt} | {spec} | FID-{n} {score:.2f} | {time.time() - t0:.0f} s", flush=True)
