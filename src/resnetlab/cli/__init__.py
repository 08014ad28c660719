"""The command-line interface (``resnetlab ...``); the library lives in the other sub-packages."""
