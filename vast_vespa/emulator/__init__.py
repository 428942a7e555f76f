"""
A local emulator of the Vast.ai autoscaler (PROTOCOL.md sections 3, 4 and 8): a development and
test tool, never a production router.
"""
