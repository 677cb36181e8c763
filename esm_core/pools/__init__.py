"""Task pools built on the user's machine from registry packages (nothing here is committed data)."""
