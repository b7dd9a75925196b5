"""Start the istr_viz Gradio demo.

``python app.py [--checkpoint FILE] [--data DIR] [--server-name HOST] [--server-port PORT]``
serves the shipped checkpoint and the built-in shapes data by default, on 127.0.0.1:7860.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path,
                        help="model checkpoint (default: $ISTR_VIZ_CHECKPOINT or the shipped one)")
    parser.add_argument("--data", type=Path,
                        help="data set root with train/ and val/ (default: the built-in shapes)")
    parser.add_argument("--server-name", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--server-port", type=int, default=7860)
    parser.add_argument("--max-file-size", default=None,
                        help="largest upload Gradio accepts, e.g. 20mb (the default)")
    args = parser.parse_args(argv)

    from istr_viz.demo import MAX_FILE_SIZE, build_demo, launch

    demo = build_demo(checkpoint=args.checkpoint, data_root=args.data)
    launch(demo, server_name=args.server_name, server_port=args.server_port,
           max_file_size=args.max_file_size or MAX_FILE_SIZE)


if __name__ == "__main__":
    main()
