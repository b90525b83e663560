"""`python -m benchmarks run [--quick] [--out DIR]`: see benchmarks/README.md."""
from benchmarks.cli import main

main()
