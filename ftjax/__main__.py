from ftjax.cli import entry

entry()
