"""router_service"""
