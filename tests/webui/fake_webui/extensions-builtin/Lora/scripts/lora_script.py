import networks  # as in the WebUI: the module stays in sys.modules for other extensions to use

networks.list_available_networks()
