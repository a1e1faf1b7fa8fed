"""The ``oss-convert`` command line (click)."""
