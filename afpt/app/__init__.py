"""The run machinery: the `afpt` and `afpt-lightning` entry points, the stage registry and the shared stage steps,
run directories (names, locks, guards) and the console."""
