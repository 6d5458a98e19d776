import os
import sys

# `python -m lip_cli` (and torchrun's `-m lip_cli`) puts the current folder first on the import
# path; the `lip` script does not. Dropped, so that a numpy.py there shadows nothing: python: model
# specs still find modules in the current folder, after the installed packages (`models`).
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

try:
    from lip_cli.cli import main
except KeyboardInterrupt:  # Ctrl-C while lip starts up: the same line and code as during a run
    sys.stderr.write("error: interrupted; nothing was written\n")
    os._exit(130)

main()
