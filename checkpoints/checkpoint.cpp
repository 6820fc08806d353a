// checkpoint writer (in progress)
