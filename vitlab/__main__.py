"""``python -m vitlab`` (also what ``torchrun -m vitlab`` runs)."""

import logging
import os
import sys

try:
    from vitlab.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch and the rest are imported (seconds on a loaded machine)
    print("vitlab: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker has left its process group (vitlab.train.distributed.teardown) and written its files. Skip
    # the interpreter's own teardown: destroying FSDP2's gloo state at exit was seen to abort a worker (std::terminate,
    # about 1 run in 10 on a loaded 2-core machine) after the job was done, which torchrun reports as a failed run.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
