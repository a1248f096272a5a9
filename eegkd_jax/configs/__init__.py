"""The configs of every mode, in the package so the library and the installed `eegkd` command
find them; `configs/*.py` at the top of the repository are the same configs for `--config=`."""
