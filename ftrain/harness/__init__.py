"""The kill-and-verify harness: starting a training command, killing it for real at random moments, letting it
recover, and comparing the result bit for bit with an uninterrupted run (``ftrain-chaos``, the tests, the
benchmark). It uses the library; the library never imports it."""
