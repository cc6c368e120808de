"""The stages after a source is read: plan the package, run it once, write the wheel."""
