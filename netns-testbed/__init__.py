"""tokenwire.testbed: network namespaces, the userspace link emulator, simulator, experiments, plots."""
