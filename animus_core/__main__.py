from animus_core.cli import main

main()
