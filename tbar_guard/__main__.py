from tbar_guard.cli import main

main()
