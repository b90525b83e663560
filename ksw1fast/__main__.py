from ksw1fast.cli.main import main

main()
