"""``python -m mmfuse.server CKPT [options]``: the same as ``mmfuse serve``."""
import argparse
import sys

from .cli import add_serve_args, run_serve

if __name__ == "__main__":  # vLLM spawns workers that re-import the main module: start nothing on import
    parser = argparse.ArgumentParser(prog="python -m mmfuse.server", description=__doc__)
    add_serve_args(parser)
    sys.exit(run_serve(parser.parse_args()))
