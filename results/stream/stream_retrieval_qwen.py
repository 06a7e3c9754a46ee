"""What ReKV retrieval buys a long Qwen2-VL stream: `stream_retrieval.py`'s measurement on the
Qwen2-VL-shaped model of `stream_latency_qwen.py` (336 px frames, 144 tokens a slice of 2
frames, 44 kept). ``max_frames=16`` and ``retrieve_frames=16`` are 8 slices each.
Run: python results/stream/stream_retrieval_qwen.py [threads]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from stream_latency_qwen import build  # noqa: E402
from stream_retrieval import main as run  # noqa: E402


def main(threads: int = 2) -> None:
    run(threads, build, 336, "results/stream/stream_retrieval_qwen.json")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
