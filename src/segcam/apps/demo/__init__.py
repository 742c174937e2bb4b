"""The demos: the CT liver-tumour report (``segcam demo``) and the small synthetic example.

``data`` fetches and reads the demo CT, ``models`` holds every demo network (architecture, layer
names, shipped weights), ``report`` writes the CT report and ``synthetic`` the synthetic figure.
"""
