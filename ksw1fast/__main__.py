from ksw1fast.cli import main

main()
