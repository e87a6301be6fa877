from saal_lightning.cli import main

main()
