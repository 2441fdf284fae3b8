"""Run open_clip's own trainer (open_clip_train) with psdclip's tiny model config registered."""
import sys

from psdclip.train import models  # noqa: F401  (registers psdclip-tiny with open_clip)

if __name__ == "__main__":
    from open_clip_train.main import main

    main(sys.argv[1:])
