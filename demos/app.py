"""Launch the mmaccel Gradio demo: ``python demos/app.py [--host 127.0.0.1] [--port 7860] [--model DIR]``.
The app itself lives in ``mmaccel.demo_app`` so that ``mmaccel demo`` works from an installed package."""
import argparse

from mmaccel.demo_app import launch

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default=None)
    a = p.parse_args()
    launch(a.model, a.host, a.port, block=True)
