"""How results are shown: the report (rich tables, bars) or the JSON document on stdout; progress,
warnings and errors on stderr.

The only package that imports rich. `console` holds the streams and the one-line messages,
`common` the pieces several commands show, and each command has its module, named after it.
"""
