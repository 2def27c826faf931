"""The pytest harness: one test file, simulated ranks or torchrun ranks (the plugin and its parts)."""
