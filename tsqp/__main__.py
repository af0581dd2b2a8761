from tsqp.cli import main

main()
