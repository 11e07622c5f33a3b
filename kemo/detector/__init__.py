"""The face detector stage (issue 4): dataset export for ultralytics; training and evaluation follow."""
