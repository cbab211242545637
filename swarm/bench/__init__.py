"""Measuring tools: probing a route (`probe`), the `swarm measure` run loop (`measure`), its report
(`report`), the analytic model (`simulate`), benchmark prompts (`prompts`) and an emulated WAN (`wan/`).

Built on the client (`swarm.client`) and decoding (`swarm.decode`); nothing in the library imports
back from here. Must not hold client or decoding logic of its own.
"""
