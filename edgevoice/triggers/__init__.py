"""Triggers: what turns a button press, a wake word or the user's voice into a turn event.

``base`` holds the events and the Trigger / AudioTrigger seams; ``button``, ``wake`` and
``bargein`` one trigger each; ``settings`` the ``triggers:`` configuration section.
gpiozero and pymicro-wakeword are imported only when a trigger that needs them starts.
"""
