"""The pipeline on the toy world (demo/run.sh, make demo) and the tool that keeps the README's table equal to it."""
