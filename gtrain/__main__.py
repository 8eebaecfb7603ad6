from gtrain.cli import main

main()
