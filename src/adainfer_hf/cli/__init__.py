"""The `adainfer` command line (`main`), its `eval` subcommand (`eval`) and what the subcommands share (`common`)."""
