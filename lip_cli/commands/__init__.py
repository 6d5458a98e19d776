"""One module per command: its options, a call to its job (`lip_cli.jobs`), its rendering
(`lip_cli.render`). Light at import: torch and rich are imported inside the commands.
"""
