"""
A sample host application's code and tests: what a project that embeds
cohortsync writes, tested with nothing but ``cohortsync.testing``.

``adapters.py`` and ``storage.py`` stand for the host's application code; in
a real project they would live in the application package, not under tests.
"""
