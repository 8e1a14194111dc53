from staging_cli.cli import main

main()
