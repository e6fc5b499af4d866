"""Developer tooling that is neither the library nor a benchmark (mutation testing of the core maths)."""
