"""Each command as a plain function: a request dataclass in, a report dataclass out.

No terminal here: progress goes to an optional callback and the reports are rendered by
`lip_cli.render` for people (rich) or machines (JSON). One module per command, named after it;
`common` holds the steps several commands share.
"""
