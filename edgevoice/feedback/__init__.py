"""Feedback: the device state as the user perceives it, through earcons and an LED.

``states`` holds :class:`~edgevoice.feedback.states.DeviceState`, shared with the
triggers; ``earcons`` synthesises the sounds; ``led`` drives the status LED;
``settings`` is the ``feedback:`` configuration section.
"""
