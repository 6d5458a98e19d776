from lip_cli.cli import main

main()
