"""
The README's MLflow screenshot: a real `mlflow server` on 127.0.0.1 over the store a run
logged to, and headless Chromium (Debian package `chromium`, driven by the `playwright`
Python package) photographing that run's metric charts once they are drawn.

    pip install playwright && apt-get install chromium                     # once; nothing else is downloaded
    python assets/mlflow_screenshot.py --store=sqlite:///mlflow.db --run=RUN_ID  # -> assets/mlflow.png
"""

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--store", default="sqlite:///mlflow.db", help="the backend store train.py logged to")
parser.add_argument("--run", required=True, help="the run id (train.py prints it; ckpt.pt holds it too)")
parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlflow.png"))
parser.add_argument("--width", type=int, default=1400)
parser.add_argument("--height", type=int, default=1400)
parser.add_argument("--chromium", default="/usr/bin/chromium")
args = parser.parse_args()

with socket.socket() as s:  # a free port
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
url = f"http://127.0.0.1:{port}"
server = subprocess.Popen(
    [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", args.store,
     "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"),
)
try:
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                sys.exit("error: mlflow server did not start")
            time.sleep(0.5)
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    run = MlflowClient(url).get_run(args.run)
    page_url = f"{url}/#/experiments/{run.info.experiment_id}/runs/{args.run}/model-metrics"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(page_url)
        page.wait_for_selector(".main-svg", timeout=120_000)  # the first chart is drawn
        for name in ["Close", "Toggle sidebar"]:  # the assistant panel and the navigation: only the run stays
            button = page.get_by_role("button", name=name, exact=True)
            if button.count():
                button.first.click()
        page.wait_for_timeout(3000)  # the other charts
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out} ({page_url})")
finally:
    server.terminate()
    server.wait(timeout=30)
