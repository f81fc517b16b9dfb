"""Tests of lorakit.integrations (a package so that its module names do not clash with other test folders')."""
