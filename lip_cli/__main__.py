try:
    from lip_cli.cli import main
except KeyboardInterrupt:  # Ctrl-C while lip starts up: the same line and code as during a run
    import os
    import sys

    sys.stderr.write("error: interrupted; nothing was written\n")
    os._exit(130)

main()
