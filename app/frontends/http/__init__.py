"""What every HTTP door shares: the request pipeline, error rendering, FastAPI dependencies, error schemas."""
