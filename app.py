"""Start the istr_viz Gradio demo: ``python app.py [--checkpoint FILE] [--data DIR]``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, help="model checkpoint (default: the shipped one)")
    parser.add_argument("--data", type=Path, help="data set root with train/ and val/ (default: built-in)")
    parser.add_argument("--server-name", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--server-port", type=int, default=7860)
    args = parser.parse_args(argv)

    from istr_viz.demo import build_demo

    demo = build_demo(checkpoint=args.checkpoint, data_root=args.data)
    demo.queue().launch(server_name=args.server_name, server_port=args.server_port,
                        max_file_size="20mb")


if __name__ == "__main__":
    main()
