from django import forms


class RoomForm(forms.Form):
    name = forms.CharField(max_length=100)
    is_private = forms.BooleanField(required=False, label="Private (members only)")
