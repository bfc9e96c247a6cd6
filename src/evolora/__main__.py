from evolora.cli import main

main()
