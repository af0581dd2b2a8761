from tsqp.cli.app import main

main()
