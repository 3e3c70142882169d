"""The `adainfer` command line (`main`), its `eval` and `lm-eval` subcommands (`eval`, `harness`) and what the
subcommands share (`common`)."""
