"""The research diagnostics, apart from the library: the mechanism check and the ablation and
differences tables with synthetic teachers of known quality, teachers side by side, and the
training-step benchmark. They import the library (dllm2rec, runs, results, cli's flags) and the
library never imports them. Run as `python -m research COMMAND` from the repository root."""
