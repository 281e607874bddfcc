from kontext_server.cli import main

main()
